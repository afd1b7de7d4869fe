"""The profile store: versioned profile tables, reading the current profiles, the promotion gate, retention and
forgetting a user."""
