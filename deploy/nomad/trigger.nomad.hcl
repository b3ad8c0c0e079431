# jobmesh trigger: API submits, trigger rules (events, webhooks, schedules, job ends) and
# the HTTP ingress in, JobSubmitted out. Its state lives in KV (jm_triggers,
# jm_trigger_state, jm_trigger_stats), so scale it with count.
# nomad job run deploy/nomad/trigger.nomad.hcl    (deploy/nomad/README.md: variables, image)

variable "image" {
  type        = string
  default     = "jobmesh:local"
  description = "The jobmesh image built from deploy/Dockerfile, pushed where every client can pull it."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "trigger_subjects" {
  type        = string
  default     = ""
  description = "JOBMESH_TRIGGER_SUBJECTS: subject patterns outside jobmesh.v1.events.> that rules may watch (comma-separated)."
}

variable "otlp_endpoint" {
  type        = string
  default     = ""
  description = "OTLP/HTTP endpoint for traces, e.g. http://tempo.service.consul:4318; empty turns export off."
}

job "jobmesh-trigger" {
  datacenters = var.datacenters
  type        = "service"

  update {
    max_parallel     = 1
    min_healthy_time = "10s"
    healthy_deadline = "3m"
    auto_revert      = true
  }

  group "trigger" {
    count = 2

    # The HTTP ingress (docs/webhooks.md). The task listens on 8480 inside its container;
    # Nomad maps a dynamic host port to it, so two allocations on one client do not
    # collide. A load balancer finds them through the service jobmesh-trigger-http.
    network {
      port "http" {
        to = 8480
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "10s"
      mode     = "delay"
    }

    task "trigger" {
      driver = "docker"

      config {
        image   = var.image
        command = "jobmesh-trigger"
        ports   = ["http"]
      }

      # SIGTERM starts the graceful drain: no new batches, in-flight ones finish within
      # JOBMESH_DRAIN_SECONDS (10 s), then the NATS connection drains (up to 5 s).
      # kill_timeout is how long Nomad waits before SIGKILL, so it must cover both.
      kill_signal  = "SIGTERM"
      kill_timeout = "30s"

      # Connection settings come from the Nomad variable at nomad/jobs, which every job in
      # the namespace may read (see README.md). The task waits until the variable exists.
      template {
        destination = "secrets/jobmesh.env"
        env         = true
        change_mode = "restart"
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs" }}
          JOBMESH_NATS_URL={{ .nats_url }}
          {{ end }}
        EOT
      }

      # Secrets the trigger looks up by name (docs/webhooks.md): one file per secret under
      # secrets/hooks/, rendered from the Nomad variable nomad/jobs/jobmesh-trigger, which
      # only this job may read. `http_submit` is the bearer token of POST /v1/jobs
      # (JOBMESH_HTTP_SUBMIT_TOKEN_SECRET below); the task waits until the variable exists
      # (deploy/nomad/README.md), and without that item the file is empty and the trigger
      # refuses to start. The token is read once at start, so a change restarts the task.
      template {
        destination = "secrets/hooks/http-submit"
        perms       = "0400"
        change_mode = "restart"
        data        = <<-EOT
          {{- with nomadVar "nomad/jobs/jobmesh-trigger" }}{{ (index . "http_submit").Value }}{{ end -}}
        EOT
      }

      # A webhook rule's secret: add one template per secret the rules name, the file named
      # as the rule's `secret`. The trigger reads it on every request, so a change needs no
      # restart. For a rule with `secret: github-webhook`:
      #
      # template {
      #   destination = "secrets/hooks/github-webhook"
      #   perms       = "0400"
      #   change_mode = "noop"
      #   data        = <<-EOT
      #     {{- with nomadVar "nomad/jobs/jobmesh-trigger" }}{{ (index . "github_webhook").Value }}{{ end -}}
      #   EOT
      # }

      env {
        # NOMAD_SECRETS_DIR is the task's secrets/ directory as the task sees it.
        JOBMESH_SECRETS_DIR              = "${NOMAD_SECRETS_DIR}/hooks"
        JOBMESH_HTTP_SUBMIT_TOKEN_SECRET = "http-submit"
        JOBMESH_HTTP_LISTEN              = "0.0.0.0:8480"
        JOBMESH_TRIGGER_SUBJECTS         = var.trigger_subjects
        JOBMESH_DRAIN_SECONDS            = "10"
        JOBMESH_LOG_LEVEL                = "INFO"
        OTEL_EXPORTER_OTLP_ENDPOINT      = var.otlp_endpoint
        OTEL_TRACES_EXPORTER             = var.otlp_endpoint == "" ? "none" : "otlp"
      }

      # `jobmesh health trigger` asks the service over NATS and exits 0 when it answers ok.
      # Script checks run inside the task and need the Consul service provider.
      service {
        name     = "jobmesh-trigger"
        provider = "consul"
        tags     = ["jobmesh"]

        check {
          name     = "jobmesh health trigger"
          type     = "script"
          command  = "/usr/local/bin/jobmesh"
          args     = ["health", "trigger"]
          interval = "15s"
          timeout  = "10s"

          check_restart {
            limit = 3
            grace = "30s"
          }
        }
      }

      # The ingress, one instance per allocation: put a load balancer (and TLS) in front,
      # fed from this service. Nomad checks GET /v1/health on the allocation's own port,
      # so an allocation whose ingress stops answering is restarted on its own.
      service {
        name     = "jobmesh-trigger-http"
        provider = "consul"
        port     = "http"
        tags     = ["jobmesh", "http"]

        check {
          name     = "jobmesh trigger http"
          type     = "http"
          path     = "/v1/health"
          interval = "10s"
          timeout  = "3s"

          check_restart {
            limit = 3
            grace = "30s"
          }
        }
      }

      resources {
        cpu    = 200
        memory = 256
      }
    }
  }
}
