"""Feedback: what providers report after sending (status webhooks, warehouse status
sources), the fallback it triggers, template statuses, and the send log for analysts."""
