package main

import "time"

// secretInterval is how often the upstreams' secret files are read again,
// as often as the serving certificate's.
const secretInterval = 5 * time.Second

// watchSecrets reads the upstreams' secret files every interval until
// stop is closed, and puts the secrets that changed in effect: a password
// or OAuth2 secret rotated in a mounted Kubernetes Secret counts within
// seconds of the kubelet updating the file, without SIGHUP.
func (in *instance) watchSecrets(interval time.Duration, stop <-chan struct{}) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			in.reloadSecrets()
		}
	}
}

// reloadSecrets reads the upstreams' secret files again and puts the
// upstreams whose secrets changed in effect with the new ones.
func (in *instance) reloadSecrets() error {
	in.reloadMu.Lock()
	defer in.reloadMu.Unlock()
	return in.applySecrets()
}

// applySecrets is reloadSecrets with in.reloadMu held. A changed secret
// is a new login: the Deliverer drops that upstream's connections, the
// idle ones at once and the busy ones when their deliveries end (they
// logged in with the old secret, which the provider may have revoked),
// and its OAuth2 token. Files that do not read, as in the middle of a
// rotation, are logged once and the running secrets kept. Secrets are
// never logged, only the names of their upstreams.
func (in *instance) applySecrets() error {
	ups, changed, err := in.cfg.ReadSecrets()
	if err != nil {
		if msg := err.Error(); msg != in.secretFailure {
			in.secretFailure = msg
			in.log.Error("upstream secrets not reloaded; using the previous ones", "error", err)
		}
		return err
	}
	in.secretFailure = ""
	if len(changed) == 0 {
		return nil
	}
	cfg := *in.cfg
	cfg.Upstreams = ups
	in.delivery.SetConfig(deliveryConfig(&cfg))
	in.cfg = &cfg
	in.log.Info("upstream secrets reloaded", "upstreams", changed)
	return nil
}
