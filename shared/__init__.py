"""Alliance Stream shared kernel: event contracts, settings, and Kafka/Mongo/metrics wiring."""
