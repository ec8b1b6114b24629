"""What plugins are written against, and how they are found: the hook specs, the plugin
types and their options, and the registry that loads plugins from entry points.
"""
