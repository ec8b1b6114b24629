"""The built-in plugins. Each module is registered through the `cifarx` entry-point group."""
