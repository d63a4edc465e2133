"""Evaluation: Inception features and the ADM evaluator's metrics.

``features`` (``extract_features``, ``feature_function``: data-parallel over a mesh), ``resize`` (the Inception input
paths: ``adm_inputs``, ``pytorch_fid_inputs``), ``metrics`` (``fid_from_features``, ``frechet_distance``,
``inception_score``, ``precision_recall``, ``adm_metrics``, ``load_reference_batch``), ``classifier`` (a small MLP
feature extractor for the small studies: ``train_classifier``, ``features_and_predictions``, ``mode_coverage``),
``inputs`` (the evaluate job's image streams).
"""
