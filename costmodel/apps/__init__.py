"""Applications of the step model: predict step records, fit residual parameters, sweep configurations,
benchmark the sweep, price single kernel calls."""
