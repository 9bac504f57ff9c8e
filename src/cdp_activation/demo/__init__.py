"""The demo: its warehouse, its PostgreSQL variant, and the scale demo on Celery workers."""
