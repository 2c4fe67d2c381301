"""From files to batches: the dataset adapter contract and `Task`, loading a dataset (its splits, images and
cache), the pretraining corpus, the `Batch`, and the synthetic benchmark (`synth/`)."""
