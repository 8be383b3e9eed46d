"""Sample-quality metrics: distances in numpy, feature networks, streaming statistics."""
