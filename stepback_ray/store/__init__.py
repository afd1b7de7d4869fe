"""The profile store: versioned profile tables, the promotion gate, retention and forgetting a user."""
