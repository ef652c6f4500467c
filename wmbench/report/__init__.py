"""Reporting: run records to tables and plots (`wmbench report`); reads nothing but records."""
