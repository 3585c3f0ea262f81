"""Integrations of maeformer_fast with other frameworks (imported only by the command line and users)."""
