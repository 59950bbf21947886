package main

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/queue"
	"smarthost/relay/upstream"
	"smarthost/webhook"
)

// openTimeout bounds connecting to a shared queue's database and
// migrating its schema at start.
const openTimeout = time.Minute

// openQueue opens the queue backend that cfg names, as serve and
// queue import use it.
func openQueue(cfg *config.Config, logger *slog.Logger, observer queue.Observer) (queue.Backend, error) {
	switch cfg.Queue.Backend {
	case config.QueuePostgres:
		ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
		defer cancel()
		st, err := queue.OpenPostgres(ctx, string(cfg.Queue.DSN), queue.PostgresOptions{
			Logger:           logger,
			Observer:         observer,
			Lease:            cfg.Queue.Lease,
			HistoryRetention: cfg.HistoryRetention,
			Webhooks:         webhook.Subscriptions(cfg.Webhooks),
		})
		if err != nil {
			// pgx's errors name the host and user, never the password.
			return nil, fmt.Errorf("queue database: %w", err)
		}
		return st, nil
	default:
		return queue.Open(cfg.Queue.Path, queue.Options{Observer: observer, Logger: logger,
			HistoryRetention: cfg.HistoryRetention, Webhooks: webhook.Subscriptions(cfg.Webhooks)})
	}
}

// sharedState is the upstreams' rate-limit windows and up/down state,
// kept in the queue's database when it is shared by replicas, so that
// they hold for the whole cluster; nil for a queue of one process. A
// replica that dies holding a rate slot or an upstream's probe holds it
// for no longer than it would hold a message: [queue] lease.
func sharedState(store queue.Backend, lease time.Duration, logger *slog.Logger) (*upstream.Cluster, error) {
	pg, ok := store.(*queue.PGStore)
	if !ok {
		return nil, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	defer cancel()
	c, err := upstream.NewCluster(ctx, pg.Pool(), pg.Owner(), upstream.ClusterOptions{Lease: lease, Logger: logger})
	if err != nil {
		return nil, fmt.Errorf("queue database: upstream state: %w", err)
	}
	return c, nil
}

// queueName says where the queue is, for the start line.
func queueName(cfg *config.Config) string {
	if cfg.Queue.Backend == config.QueuePostgres {
		return "postgres"
	}
	return cfg.Queue.Path
}
