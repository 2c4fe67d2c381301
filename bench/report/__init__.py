"""Results records -> tables (`table`: selection, cells and statistics, references, renderers) and plots."""
