package config

// What the black-box tests check of the parser's own rules.
var (
	OAuthKeys      = oauthKeys
	IsLoopbackHost = isLoopbackHost
)
