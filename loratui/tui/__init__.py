"""The Textual app: a wizard over the headless pipeline (the only package that imports textual)."""
