"""Model access: architecture helpers, where a model comes from and how it loads
(whole or one block at a time), devices and dtypes, and assembly of the saved model."""
