package vault

// Token exposes the client's current token to tests that watch renewal.
func (s *Signer) Token() string { return s.client.Token() }
