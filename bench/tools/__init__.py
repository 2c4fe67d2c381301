"""Commands built on the experiment chain: `suite` (grids), `sweep/` (Optuna), `profile/` (speed), and the
dataset inspection and mask views."""
