"""Privacy audit modules."""
