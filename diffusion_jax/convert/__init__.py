"""Weight importers from other frameworks; torch stays optional."""
