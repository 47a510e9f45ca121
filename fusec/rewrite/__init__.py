"""Structural matching, preconditions, the rewrite driver and the fusion report."""
