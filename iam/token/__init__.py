"""The token role: OAuth endpoints, the phantom-token pair, and the token store."""
