package main

import (
	"log/slog"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/queue"
)

// openQueue opens the queue backend that cfg names, as serve and
// queue import use it.
func openQueue(cfg *config.Config, logger *slog.Logger, observer queue.Observer) (queue.Backend, error) {
	return queue.Open(cfg.Queue.Path, queue.Options{Observer: observer, Logger: logger})
}
