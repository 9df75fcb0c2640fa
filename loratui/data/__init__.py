"""Small datasets authored by this project (quickstart, continual-learning demo)."""
