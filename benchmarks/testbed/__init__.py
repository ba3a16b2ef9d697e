"""The digits world: a small SD-structured model trained on scikit-learn digits, and its judge."""
