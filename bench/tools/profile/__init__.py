"""`bench profile`: how fast the shared trainer runs each method, against the hardware's limit.

One JSON line per configuration (method[:ablation] x model preset x input x variant):
- input `synthetic`: batches of random images and generated reports, built in memory and placed on the device
  beforehand, so a step is the model's work alone (what the GPU can consume);
- input `files`: the real path, the pretraining corpus read from disk (the synthetic benchmark, or your data
  roots) through the trainer's loader, workers and image cache; the line also says how many images/s the
  loader alone delivers;
- variant `trainer`: the trainer's optimiser step with the configured speed switches (runtime.speed);
  variant `plain`: a plain fp32 eager loop of the same model (forward, backward, AdamW) to compare against.

Timing is synchronised (the device is drained before and after each step) and the median over the timed
steps after warm-up is reported. The variants of one configuration take turns step by step, so a machine that
speeds up or slows down affects them alike and their ratio is measured in one run. Model FLOPs per step are
counted once (matmuls, convolutions, attention; forward and backward) on the eager model; MFU divides the
achieved FLOP rate by the device's bf16 peak, both as measured here with a large matmul and as the vendor
states it.

Modules: `command` (the configurations and the printed table), `profiler` (timing the variants step by
step), `inputs` (the batches: in memory, or through the trainer's loader) and `measure` (device peak,
memory, FLOPs).
"""
