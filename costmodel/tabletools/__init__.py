"""Kernel-table tooling: measure tables on a GPU (`measure`), import AIConfigurator's database
(`importer`), cross-validate tables against each other (`crossval`)."""
