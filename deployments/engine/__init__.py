"""The generation engine: scheduling over a ModelRunner, and turning tokens into text."""
