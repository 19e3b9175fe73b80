"""One module per grant type; each turns an authenticated client and a form into a token response body."""
