"""Studies built on the library (each a package or module run by a CLI job): the digits demo, the toy study, GM-solver reports."""
