"""The experiment chain: configs composed and checked, the hashes that identify runs and records, set-up,
pretraining, evaluating, checkpoints, and `chain.pretrain_and_evaluate` that `run`, `suite` and `sweep --finalize`
share."""
