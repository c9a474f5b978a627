"""The implementation of each `bitblend` verb; bitblend.cli parses the arguments and
dispatches here. Each command imports what it uses inside its function: torch, transformers
and scikit-learn take seconds to import, and `bitblend --help`, `recipes` or a one-line
argument error must not pay for every command's dependencies."""
