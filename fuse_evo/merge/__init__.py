"""Recipe -> live weights: pure tensor operators (methods.py)."""
