// A Confluent-compatible schema registry for the tests and local runs: Conduit's
// (github.com/conduitio/conduit-schema-registry, Apache-2.0) with an in-memory store, served
// over HTTP. It implements register-schema and get-schema-by-id, all the worker uses.
//
//	go build -o registry . && ./registry -addr 127.0.0.1:8081
package main

import (
	"context"
	"flag"
	"log/slog"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/conduitio/conduit-commons/database/inmemory"
	schemaregistry "github.com/conduitio/conduit-schema-registry"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8081", "listen address")
	flag.Parse()
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))

	registry, err := schemaregistry.NewSchemaRegistry(&inmemory.DB{})
	if err != nil {
		logger.Error("cannot create the registry", "error", err)
		os.Exit(1)
	}
	mux := http.NewServeMux()
	schemaregistry.NewServer(logger, registry).RegisterHandlers(mux)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	server := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = server.Shutdown(shutdown)
	}()
	if err := server.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		logger.Error("registry stopped", "error", err)
		os.Exit(1)
	}
}
