package main

import (
	"errors"
	"fmt"
	"reflect"

	"smarthost/cmd/smarthost/internal/config"
)

// reload reads the configuration file at path again, on SIGHUP, and
// applies what can change while the relay runs, without dropping a
// connection or a queued message: users, DKIM keys, upstreams and routes,
// their secrets, the certificate files and shutdown_timeout. Keys that need a restart
// keep their running values, with a warning naming them. A configuration
// with any problem is rejected whole, the problems logged, and the
// running one kept. The outcome goes to onReload.
func (in *instance) reload(path string) error {
	in.reloadMu.Lock()
	defer in.reloadMu.Unlock()
	err := in.applyConfig(path)
	if err != nil {
		in.log.Error("configuration reload failed", "config", path, "problems", configProblems(err))
		if in.certs != nil {
			// The certificate files are not the configuration: SIGHUP
			// still makes a renewed pair count at once.
			in.certs.Reload()
		}
		// Nor are the secret files: a rotated password counts all the
		// same.
		in.applySecrets()
	}
	if in.onReload != nil {
		in.onReload(err)
	}
	return err
}

// applyConfig loads and applies a configuration; in.reloadMu must be
// held. Whatever can fail is done before anything changes.
func (in *instance) applyConfig(path string) error {
	cfg, err := config.Load(path)
	if err != nil {
		return err
	}
	old := in.cfg
	restart := keepRestartValues(cfg, old, in.certs != nil)
	signer, err := newSigner(cfg)
	if err != nil {
		return err
	}
	if in.certs != nil {
		// The same files are read again too: SIGHUP is also the way to
		// make a renewed certificate count at once.
		if err := in.certs.SetFiles(cfg.TLSCertFile, cfg.TLSKeyFile); err != nil {
			return config.Errors{{Key: "tls.cert_file", Msg: err.Error()}}
		}
	}

	in.srv.SetUsers(cfg.Users)
	if in.initUsers != nil {
		in.initUsers(userNames(cfg.Users))
	}
	in.srv.SetSigner(signer)
	// Deliveries in flight finish under the configuration they started
	// with; what the Deliverer learnt about the upstreams that stay the
	// same is kept.
	in.delivery.SetConfig(deliveryConfig(cfg))
	in.cfg = cfg

	if len(restart) > 0 {
		in.log.Warn("configuration changes that need a restart were not applied", "keys", restart)
	}
	in.log.Info("configuration reloaded", "config", path, "users", len(cfg.Users),
		"dkim_domains", dkimDomains(cfg.DKIM), "upstreams", len(cfg.Upstreams), "routes", len(cfg.Routes))
	return nil
}

// keepRestartValues sets in cfg the running values, from old, of the keys
// that only a restart applies, and returns the names of those that cfg
// changed. withCerts says whether the relay serves a certificate, whose
// files may then change.
func keepRestartValues(cfg, old *config.Config, withCerts bool) []string {
	var changed []string
	keep := func(key string, differs bool, restore func()) {
		if differs {
			changed = append(changed, key)
		}
		restore()
	}
	keep("hostname", cfg.Hostname != old.Hostname, func() { cfg.Hostname = old.Hostname })
	keep("log_format", cfg.LogFormat != old.LogFormat, func() { cfg.LogFormat = old.LogFormat })
	keep("log_level", cfg.LogLevel != old.LogLevel, func() { cfg.LogLevel = old.LogLevel })
	q, oq := &cfg.Queue, &old.Queue
	keep("queue.path", q.Path != oq.Path, func() { q.Path = oq.Path })
	keep("queue.backend", q.Backend != oq.Backend, func() { q.Backend = oq.Backend })
	keep("queue.dsn", q.DSN != oq.DSN, func() { q.DSN = oq.DSN })
	keep("queue.lease", q.Lease != oq.Lease, func() { q.Lease = oq.Lease })
	keep("queue.retry_min", q.RetryMin != oq.RetryMin, func() { q.RetryMin = oq.RetryMin })
	keep("queue.retry_max", q.RetryMax != oq.RetryMax, func() { q.RetryMax = oq.RetryMax })
	keep("queue.max_age", q.MaxAge != oq.MaxAge, func() { q.MaxAge = oq.MaxAge })
	keep("queue.bounce", q.Bounce != oq.Bounce, func() { q.Bounce = oq.Bounce })
	keep("queue.delay_warning", q.DelayWarning != oq.DelayWarning, func() { q.DelayWarning = oq.DelayWarning })
	keep("queue.workers", q.Workers != oq.Workers, func() { q.Workers = oq.Workers })
	keep("history.retention", cfg.HistoryRetention != old.HistoryRetention, func() { cfg.HistoryRetention = old.HistoryRetention })
	keep("webhook", !reflect.DeepEqual(cfg.Webhooks, old.Webhooks), func() { cfg.Webhooks = old.Webhooks })
	keep("listen", !reflect.DeepEqual(cfg.Listeners, old.Listeners), func() { cfg.Listeners = old.Listeners })
	keep("limits", cfg.Limits != old.Limits, func() { cfg.Limits = old.Limits })
	keep("http.address", cfg.HTTPAddress != old.HTTPAddress, func() { cfg.HTTPAddress = old.HTTPAddress })
	keep("http.admin_token_env", cfg.AdminTokenEnv != old.AdminTokenEnv, func() { cfg.AdminTokenEnv = old.AdminTokenEnv })
	keep("http.max_connections", cfg.HTTPMaxConnections != old.HTTPMaxConnections, func() { cfg.HTTPMaxConnections = old.HTTPMaxConnections })
	if !withCerts || cfg.TLSCertFile == "" {
		// Started without a certificate, no listener can use one; and a
		// configuration without one is valid only if no listener, as
		// running, needs it: the running files stay.
		differs := cfg.TLSCertFile != old.TLSCertFile || cfg.TLSKeyFile != old.TLSKeyFile
		keep("tls", differs, func() { cfg.TLSCertFile, cfg.TLSKeyFile = old.TLSCertFile, old.TLSKeyFile })
	}
	return changed
}

// configProblems lists the problems of a configuration, each naming its
// key, for a log line.
func configProblems(err error) []string {
	var errs config.Errors
	if errors.As(err, &errs) {
		out := make([]string, len(errs))
		for i, e := range errs {
			out[i] = e.Error()
		}
		return out
	}
	return []string{fmt.Sprint(err)}
}
