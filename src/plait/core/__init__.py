"""Pure functions on tensors: flat parameter vectors, aggregation, models. No I/O, no processes."""
