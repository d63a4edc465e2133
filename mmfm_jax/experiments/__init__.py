"""Studies built on the library, each run by a CLI job: the digits demo (``experiments.digits``), the toy study
(``experiments.toy``) and the GM-solver step tables (``experiments.gm_report``)."""
