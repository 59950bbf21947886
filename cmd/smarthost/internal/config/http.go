package config

import (
	"errors"
	"fmt"
	"os"

	"github.com/BurntSushi/toml"

	"smarthost/metrics"
)

// Defaults of the [http] keys, applied by the parser to a key left out.
const (
	DefaultHTTPAddress        = "127.0.0.1:9090"              // address: loopback only
	DefaultHTTPMaxConnections = metrics.DefaultMaxConnections // max_connections
)

// AdminEndpoint is where a client finds the admin API of a running
// relay: the [http] address and admin_token_env of its configuration
// file; a key that is not set is "".
type AdminEndpoint struct {
	Address       string `toml:"address"`
	AdminTokenEnv string `toml:"admin_token_env"`
}

// ReadAdminEndpoint reads the [http] table of the file at path, and only
// it, leniently: the rest may need secrets that an administrator's shell
// does not have. A file that does not exist gives the zero AdminEndpoint.
func ReadAdminEndpoint(path string) (AdminEndpoint, error) {
	var file struct {
		HTTP AdminEndpoint `toml:"http"`
	}
	data, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return AdminEndpoint{}, fmt.Errorf("read config: %w", err)
	default:
		if _, err := toml.Decode(string(data), &file); err != nil {
			return AdminEndpoint{}, fmt.Errorf("config %s: [http]: %w", path, err)
		}
	}
	return file.HTTP, nil
}

// http reads the [http] table: the listener of the metrics, the probes
// and the admin API.
func (p *parser) http(t *table) (address, adminTokenEnv string, maxConnections int) {
	address = t.strDefault("address", DefaultHTTPAddress)
	if err := checkHostPort(address, false); err != nil {
		t.errorf("address", "%v", err)
	}
	maxConnections = t.integer("max_connections", DefaultHTTPMaxConnections, 1)
	if env, ok := t.str("admin_token_env"); ok {
		// A named token that is missing would leave the admin API open or
		// unusable; either way the operator meant something else.
		if env == "" {
			t.errorf("admin_token_env", "must name an environment variable")
		} else if t.readsSecret("http") && os.Getenv(env) == "" {
			t.errorf("admin_token_env", "environment variable %s is not set or empty", env)
		}
		adminTokenEnv = env
	}
	t.done()
	return address, adminTokenEnv, maxConnections
}
