"""Data: image sources as grain pipelines, preprocessing and latent datasets.

``images`` (``ImageFolderSource``, ``TfdsSource``, ``make_source``, ``image_dataset``, ``prepare_imagenet2012``),
``preprocess`` (``center_crop_arr``, ``mmfm_train_transform``, ``imagenet_normalize``), ``latents`` (sharded
ArrayRecord latents: ``LatentShardWriter``, ``LatentShards``, ``InMemoryLatents``, ``make_dataset``,
``make_iterator``), ``stats`` (per-position latent statistics: ``RunningStats``, ``normalize``, ``denormalize``),
``digits`` (scikit-learn's digits for the demo: ``load_digits_split``), ``encoding`` (the encode job's program
and shard writing), ``gmm_inputs`` (the [CLS] and latent batches a GMM fit reads), ``shards`` (resumable shard
lists: ``pending_shards``), ``synthetic`` (a synthetic latent dataset for tests and benchmarks).
"""
