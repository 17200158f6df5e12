"""Expert upcycling: the operator (pure), utility scores, and the expand pipeline."""
