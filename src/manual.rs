//! The manual: `registrar(1)` and one page per command
//! (`registrar-agent(1)`, ...), generated from the command line's own
//! definition by clap_mangen (name, synopsis, description, every flag with
//! its environment variable), followed by what clap does not know: exit
//! status, environment, files, examples and the other pages.

use roff::{Roff, bold, roman};

/// What one page adds to clap's sections.
struct Extra {
    exit: &'static [(u8, &'static str)],
    files: &'static [(&'static str, &'static str)],
    examples: &'static [(&'static str, &'static str)],
}

const USAGE: (u8, &str) = (
    2,
    "usage error: a bad or missing flag or value (clap names it)",
);
const CONFIG: (u8, &str) = (
    78,
    "invalid configuration: every problem is listed, with file:line:column where known",
);
const DENIED: (u8, &str) = (
    77,
    "etcd denied access, or TLS could not be set up with the last endpoint tried",
);
const UNAVAILABLE: (u8, &str) = (69, "etcd could not be reached within --timeout");

const CONFIG_FILE: (&str, &str) = (
    "/etc/registrar/registrar.yaml",
    "the configuration the packaged units pass with --config (README \"Configuration\")",
);
const DEFAULTS: (&str, &str) = (
    "/etc/default/registrar",
    "REGISTRAR_* overrides and REGISTRAR_OPTS for registrar.service and registrar-register.service",
);
const STATE: (&str, &str) = (
    "/var/lib/registrar",
    "the state directory: a generated machine id when /etc/machine-id is absent, the maintenance state, and agent.lock",
);

fn extra(command: &str) -> Extra {
    match command {
        "agent" => Extra {
            exit: &[
                (
                    0,
                    "stopped by SIGTERM or SIGINT; the lease was revoked first, so the host's keys are gone",
                ),
                (
                    1,
                    "runtime failure, e.g. the --metrics-listen port is taken (systemd restarts the agent)",
                ),
                USAGE,
                DENIED,
                CONFIG,
            ],
            files: &[
                CONFIG_FILE,
                DEFAULTS,
                STATE,
                (
                    "/etc/machine-id",
                    "proves that this machine owns the host name",
                ),
            ],
            examples: &[
                (
                    "registrar agent --config /etc/registrar/registrar.yaml",
                    "What registrar.service runs.",
                ),
                (
                    "registrar agent --endpoints http://10.0.0.1:2379 --dc dc1 --role web --service http=8080",
                    "Register with flags only; health is passing without checks.",
                ),
                (
                    "systemctl reload registrar",
                    "Apply an edited config (roles, services, meta, checks) on the same lease.",
                ),
            ],
        },
        "register" => Extra {
            exit: &[
                (0, "registered"),
                (1, "runtime failure"),
                USAGE,
                (
                    3,
                    "conflict: the host name is held by another machine's live lease",
                ),
                UNAVAILABLE,
                DENIED,
                CONFIG,
            ],
            files: &[CONFIG_FILE, DEFAULTS, STATE],
            examples: &[
                (
                    "registrar register --endpoints https://10.0.0.1:2379 --dc dc1 --role web --ttl 300s",
                    "From cloud-init: the keys expire 300 s after the last renewal.",
                ),
                (
                    "registrar register --dc dc1 --role web --keep-alive",
                    "Stay in the foreground and keep the lease alive.",
                ),
            ],
        },
        "deregister" => Extra {
            exit: &[
                (0, "deregistered, or nothing was registered"),
                (1, "runtime failure"),
                USAGE,
                (3, "the registration belongs to another machine id"),
                UNAVAILABLE,
                DENIED,
                CONFIG,
            ],
            files: &[CONFIG_FILE, STATE],
            examples: &[(
                "registrar deregister --dc dc1 --role web",
                "Remove this host's keys now.",
            )],
        },
        "check-config" => Extra {
            exit: &[
                (0, "valid; the effective configuration is printed"),
                USAGE,
                CONFIG,
            ],
            files: &[CONFIG_FILE],
            examples: &[(
                "registrar check-config --config /etc/registrar/registrar.yaml",
                "Validate before a reload.",
            )],
        },
        "maintenance" => Extra {
            exit: &[
                (0, "done; the running agent applies it within a second"),
                (1, "the state directory cannot be written"),
                USAGE,
                CONFIG,
            ],
            files: &[STATE],
            examples: &[
                (
                    "registrar maintenance on --reason \"kernel upgrade\" --for 30m",
                    "Drain this host; consumers using --healthy stop sending traffic.",
                ),
                ("registrar maintenance off", "Back in service."),
            ],
        },
        "ls" => Extra {
            exit: &[
                (0, "listed"),
                (1, "runtime failure"),
                USAGE,
                UNAVAILABLE,
                DENIED,
                CONFIG,
            ],
            files: &[],
            examples: &[
                (
                    "registrar ls dc1/web --healthy",
                    "The healthy hosts of a role.",
                ),
                (
                    "registrar ls dc1 -o json",
                    "Every host of a DC as one JSON document (stable schema).",
                ),
            ],
        },
        "watch" => Extra {
            exit: &[
                (0, "stopped by SIGINT or SIGTERM, or its output was closed"),
                (1, "runtime failure"),
                USAGE,
                DENIED,
                CONFIG,
            ],
            files: &[],
            examples: &[(
                "registrar watch dc1/web -o json",
                "One JSON object per host event.",
            )],
        },
        "wait" => Extra {
            exit: &[
                (0, "enough hosts; they are printed"),
                (
                    1,
                    "--timeout passed, or interrupted; how many were found is printed",
                ),
                USAGE,
                DENIED,
                CONFIG,
            ],
            files: &[],
            examples: &[(
                "registrar wait --dc dc1 --role etcd --count 3 --healthy --timeout 10m",
                "A readiness gate before bootstrapping a cluster.",
            )],
        },
        "render" => Extra {
            exit: &[
                (0, "rendered (--once), or stopped by SIGTERM or SIGINT"),
                (
                    1,
                    "--once: a check, a reload or min_hosts failed; also a taken --metrics-listen port",
                ),
                USAGE,
                (69, "--once: etcd could not be reached within --timeout"),
                DENIED,
                (78, "invalid configuration, or a template error"),
            ],
            files: &[(
                "/etc/registrar/render.yaml",
                "connection settings and templates: (what registrar-render.service passes)",
            )],
            examples: &[
                (
                    "registrar render --config /etc/registrar/render.yaml",
                    "Keep the files rendered.",
                ),
                (
                    "registrar render --config /etc/registrar/render.yaml --dry-run",
                    "Print the output; write and run nothing.",
                ),
            ],
        },
        "dns" => Extra {
            exit: &[
                (0, "stopped by SIGTERM or SIGINT"),
                (
                    1,
                    "a --listen or --metrics-listen port is taken (systemd restarts it)",
                ),
                USAGE,
                (
                    77,
                    "a port below 1024 without CAP_NET_BIND_SERVICE, or etcd denied access",
                ),
                CONFIG,
            ],
            files: &[(
                "/etc/registrar/dns.yaml",
                "connection settings and srv_min (what registrar-dns.service passes)",
            )],
            examples: &[
                (
                    "registrar dns --config /etc/registrar/dns.yaml --listen 127.0.0.1:8600",
                    "Serve behind the host's resolver.",
                ),
                (
                    "dig @127.0.0.1 -p 8600 SRV _etcd-server._tcp.etcd.dc1.registry.internal",
                    "What etcd --discovery-srv etcd.dc1.registry.internal asks.",
                ),
            ],
        },
        "completions" => Extra {
            exit: &[(0, "printed"), USAGE],
            files: &[],
            examples: &[(
                "registrar completions bash > /etc/bash_completion.d/registrar",
                "Install bash completion.",
            )],
        },
        "man" => Extra {
            exit: &[(0, "written"), (1, "a page could not be written"), USAGE],
            files: &[],
            examples: &[
                ("registrar man | man -l -", "Read registrar(1)."),
                (
                    "registrar man --dir /usr/local/share/man/man1",
                    "Install every page.",
                ),
            ],
        },
        _ => Extra {
            exit: &[
                (0, "ok"),
                (1, "runtime failure"),
                USAGE,
                (
                    3,
                    "conflict: the host name is held by another machine's live lease",
                ),
                (69, "etcd unavailable (one-shot commands, after --timeout)"),
                DENIED,
                CONFIG,
            ],
            files: &[CONFIG_FILE, DEFAULTS, STATE],
            examples: &[
                (
                    "systemctl enable --now registrar",
                    "After editing /etc/registrar/registrar.yaml.",
                ),
                ("registrar ls --healthy", "What the registry holds."),
            ],
        },
    }
}

/// Variables read besides each flag's own (listed with the flag).
const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "REGISTRAR_LOG",
        "log filter: a level (error, warn, info, debug, trace) or target=level directives, e.g. info,registrar=debug",
    ),
    (
        "ETCDCTL_ENDPOINTS, ETCDCTL_CACERT, ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER",
        "etcdctl's variables, below the REGISTRAR_* ones and above the config file",
    ),
    (
        "NOTIFY_SOCKET",
        "set by systemd for Type=notify units: READY=1, STATUS= and WATCHDOG=1 go there",
    ),
];

fn section(roff: &mut Roff, title: &str) {
    roff.control("SH", [title]);
}

fn item(roff: &mut Roff, term: &str, text: &str) {
    roff.control("TP", []);
    roff.text([bold(term)]);
    roff.text([roman(text)]);
}

/// The page of `cmd` (the whole command line, or one subcommand of it,
/// already built so that its name is `registrar-<command>`).
fn page(cmd: &clap::Command, command: &str, all: &[String]) -> std::io::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("registrar {}", env!("CARGO_PKG_VERSION")))
        .manual("registrar manual");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    let extra = extra(command);
    let mut roff = Roff::default();
    section(&mut roff, "EXIT STATUS");
    for (code, text) in extra.exit {
        item(&mut roff, &code.to_string(), text);
    }
    section(&mut roff, "ENVIRONMENT");
    roff.text([roman(
        "Every flag that has one names its REGISTRAR_* variable above; a flag beats its variable, which beats the config file.",
    )]);
    for (name, text) in ENVIRONMENT {
        item(&mut roff, name, text);
    }
    if !extra.files.is_empty() {
        section(&mut roff, "FILES");
        for (path, text) in extra.files {
            item(&mut roff, path, text);
        }
    }
    section(&mut roff, "EXAMPLES");
    for (line, text) in extra.examples {
        roff.control("TP", []);
        roff.text([bold(*line)]);
        roff.text([roman(*text)]);
    }
    section(&mut roff, "SEE ALSO");
    let others: Vec<String> = all
        .iter()
        .filter(|p| p.as_str() != cmd.get_display_name().unwrap_or(cmd.get_name()))
        .map(|p| format!("{p}(1)"))
        .collect();
    roff.text([roman(format!(
        "{}, etcd(1), systemd.service(5). The README in /usr/share/doc/registrar has the key layout, the guarantees and recipes.",
        others.join(", ")
    ))]);
    roff.to_writer(&mut out)?;
    Ok(out)
}

/// Every page: (file name, roff). `registrar.1` first.
pub fn pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut root = crate::cli::command().disable_help_subcommand(true);
    root.build();
    let subs: Vec<clap::Command> = root
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut names = vec!["registrar".to_string()];
    names.extend(subs.iter().map(|s| {
        s.get_display_name()
            .unwrap_or_else(|| s.get_name())
            .to_string()
    }));
    let mut out = vec![("registrar.1".to_string(), page(&root, "", &names)?)];
    for sub in &subs {
        let name = sub.get_display_name().unwrap_or_else(|| sub.get_name());
        out.push((format!("{name}.1"), page(sub, sub.get_name(), &names)?));
    }
    Ok(out)
}
