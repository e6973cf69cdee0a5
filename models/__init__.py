"""Neural network modules built on nde's solvers."""
