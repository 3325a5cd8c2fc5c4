"""The daemon: cron scheduler, HTTP server, metrics, and the restore Job's client."""

# set in the environment of every operation the daemon runs as a child process (the child's cli then asks
# for SIGTERM when the daemon dies: sidecar.cli._die_with_the_daemon)
DAEMON_PID_VARIABLE = "SIDECAR_DAEMON_PID"
