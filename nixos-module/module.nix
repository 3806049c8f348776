# NixOS module for cnishift.
#
#   services.cnishift-agent                    runs the agent (mutual-TLS gRPC) as a
#                                              hardened systemd service, with its
#                                              dead-man rollback and its etcd snapshot
#                                              in units of their own
#   services.cnishift.ciliumPrerequisites      the runbook's Phase 2 as one switch:
#                                              modules, sysctls, bpffs, k3s flags
{ config, lib, pkgs, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types;
  cfg = config.services.cnishift-agent;
  stateUnderVarLib = lib.hasPrefix "/var/lib/" cfg.stateDir;
  prereq = config.services.cnishift.ciliumPrerequisites;

  # systemd hands the TLS files over with LoadCredential: the service reads
  # them from $CREDENTIALS_DIRECTORY (%d), never from the Nix store, and the
  # original files may stay readable by root only.
  credentialArgs = [
    "--tls-ca"
    "%d/ca.pem"
    "--tls-cert"
    "%d/cert.pem"
    "--tls-key"
    "%d/key.pem"
  ];

  serveArgs = [
    "serve"
    "--listen"
    "${cfg.listenAddress}:${toString cfg.port}"
    "--node-name"
    cfg.nodeName
    "--coordinator-identity"
    cfg.coordinatorIdentity
    "--state-dir"
    cfg.stateDir
    "--etcd-snapshot-timeout"
    "${toString cfg.etcdSnapshot.timeout}s"
  ] ++ credentialArgs ++ cfg.extraArgs;

  absolutePath = types.addCheck types.str (p: builtins.substring 0 1 p == "/") // {
    name = "absolutePath";
    description = "absolute path (a string starting with /, kept out of the Nix store)";
  };

  # The paths cleanup may remove Flannel's leftovers from; everything else is
  # read-only to the service (ProtectSystem=strict).
  cleanupPaths = [
    "/etc/cni/net.d"
    "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    "/var/lib/rancher/k3s/agent/etc/flannel"
    "/run/flannel"
    "/var/lib/cni"
  ];

  # The dead-man rollback, run by cnishift-rollback@<generation>.service
  # (declared below, outside the agent's unit) with the generation number as
  # its argument (%i): set the system profile back to that generation, then
  # activate it. Anything but digits is refused before a file is looked at.
  rollbackScript = pkgs.writeShellScript "cnishift-rollback" ''
    set -eu
    generation=''${1-}
    case "$generation" in
      "" | *[!0-9]*)
        echo "cnishift-rollback: refusing generation '$generation': it must be digits only" >&2
        exit 2
        ;;
    esac
    link=/nix/var/nix/profiles/system-$generation-link
    if [ ! -e "$link" ]; then
      echo "cnishift-rollback: no system generation $generation: $link does not exist" >&2
      exit 1
    fi
    system=$(${pkgs.coreutils}/bin/readlink -f "$link")
    echo "cnishift-rollback: setting the system profile back to generation $generation ($system)"
    ${config.nix.package}/bin/nix-env --profile /nix/var/nix/profiles/system --set "$system"
    exec "$system/bin/switch-to-configuration" switch
  '';

  # The etcd snapshot the migration takes before it touches the first
  # controller (a k3s server with embedded etcd), run by
  # cnishift-etcd-snapshot@<run>.service (declared below, outside the agent's
  # unit, which may not write k3s's snapshot directory) with the migration's
  # run id as its argument (%i): k3s's own `etcd-snapshot save`, which names the
  # file cnishift-pre-<run>-<node>-<unix seconds> under
  # /var/lib/rancher/k3s/server/db/snapshots. The run id is checked again here
  # (the agent checks it first): 1 to 64 of A-Z a-z 0-9 . _ -, no leading dot.
  etcdSnapshotScript = pkgs.writeShellScript "cnishift-etcd-snapshot" ''
    set -eu
    run=''${1-}
    case "$run" in
      "" | .* | *[!A-Za-z0-9._-]*)
        echo "cnishift-etcd-snapshot: refusing run id '$run': 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.'" >&2
        exit 2
        ;;
    esac
    if [ "''${#run}" -gt 64 ]; then
      echo "cnishift-etcd-snapshot: refusing run id '$run': longer than 64 characters" >&2
      exit 2
    fi
    exec ${config.services.k3s.package}/bin/k3s etcd-snapshot save --name "cnishift-pre-$run"
  '';
in
{
  options.services.cnishift-agent = {
    enable = mkEnableOption "the cnishift agent, which checks this node for Cilium and does the node-local migration work";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      description = "The cnishift package providing bin/cnishift-agent.";
    };

    nodeName = mkOption {
      type = types.str;
      default = config.networking.hostName;
      description = "The node name; the agent's certificate must carry it as a DNS SAN.";
    };

    listenAddress = mkOption {
      type = types.str;
      default = "0.0.0.0";
      description = "Address the gRPC listener binds to.";
    };

    port = mkOption {
      type = types.port;
      default = 7443;
      description = "TCP port of the agent's mutual-TLS gRPC listener.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the agent's port in the NixOS firewall.";
    };

    tls = {
      caFile = mkOption {
        type = absolutePath;
        description = "Path (not contents) of the cluster CA certificate; handed to the service with LoadCredential.";
      };
      certFile = mkOption {
        type = absolutePath;
        description = "Path of this agent's certificate (SAN = nodeName).";
      };
      keyFile = mkOption {
        type = absolutePath;
        description = "Path of this agent's private key (e.g. a sops-nix secret).";
      };
    };

    coordinatorIdentity = mkOption {
      type = types.str;
      default = "cnishift-coordinator";
      description = "The certificate identity (SAN) allowed to call changing RPCs.";
    };

    rollback.command = mkOption {
      type = types.str;
      default = "systemctl start --wait cnishift-rollback@{generation}.service";
      description = ''
        Command the dead-man rollback runs when a switched node is not confirmed in time
        (handed to the agent as CNISHIFT_ROLLBACK_COMMAND). `{generation}` is the number of
        the NixOS system generation that was current when the switch was armed (digits only,
        from /nix/var/nix/profiles/system -> system-N-link) and `{node}` the node name. The
        default starts the `cnishift-rollback@` unit this module declares and waits for it:
        the rollback runs there, outside the agent's hardened unit, and its result is the
        rollback's outcome.
      '';
    };

    rollback.script = mkOption {
      type = types.package;
      readOnly = true;
      internal = true;
      default = rollbackScript;
      description = "The script `cnishift-rollback@<generation>.service` runs (read-only; for inspection).";
    };

    etcdSnapshot.command = mkOption {
      type = types.str;
      default = "systemctl start --wait cnishift-etcd-snapshot@{run}.service";
      description = ''
        Command the agent runs (on a k3s server with embedded etcd) when the coordinator asks
        for an etcd snapshot before the migration touches the first controller (handed to the
        agent as CNISHIFT_ETCD_SNAPSHOT_COMMAND). `{run}` is the migration's run id (1 to 64 of
        A-Z a-z 0-9 . _ -) and `{node}` the node name; unknown placeholders stop the agent at
        start. The command must write the snapshot under /var/lib/rancher/k3s/server/db/snapshots
        (the agent reports the new file whose name holds the run id, and its size). The default
        starts the `cnishift-etcd-snapshot@` unit this module declares, which runs
        `k3s etcd-snapshot save --name cnishift-pre-<run>` outside the agent's hardened unit.
      '';
    };

    etcdSnapshot.timeout = mkOption {
      type = types.ints.between 20 3600;
      default = 120;
      description = ''
        Seconds one etcd snapshot may take before the agent kills its command
        (`--etcd-snapshot-timeout`); the snapshot unit's own TimeoutStartSec is 10 s shorter,
        so `systemctl start --wait` returns the unit's result before the agent gives up.
      '';
    };

    etcdSnapshot.script = mkOption {
      type = types.package;
      readOnly = true;
      internal = true;
      default = etcdSnapshotScript;
      description = "The script `cnishift-etcd-snapshot@<run>.service` runs (read-only; for inspection).";
    };

    stateDir = mkOption {
      type = absolutePath;
      default = "/var/lib/cnishift-agent";
      description = "The agent's state (backups, journals, the armed rollback); created by systemd.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra arguments for `cnishift-agent serve`.";
    };
  };

  options.services.cnishift.ciliumPrerequisites = {
    enable = mkEnableOption "the kernel modules, sysctls, bpffs mount and k3s flags Cilium needs (the runbook's Phase 2)";
  };

  config = lib.mkMerge [
    (mkIf cfg.enable {
      systemd.services.cnishift-agent = {
        description = "cnishift agent: Cilium readiness and node-local migration work";
        wantedBy = [ "multi-user.target" ];
        after = [ "network-online.target" ];
        wants = [ "network-online.target" ];
        # ip for interface cleanup, iptables-save/-restore for chains, modprobe for remediation,
        # systemctl for the rollback command's default. Starting cnishift-rollback@ needs no
        # new capability or writable path: systemctl asks systemd over its unix socket
        # (AF_UNIX is in RestrictAddressFamilies below; connecting to a socket is not a write
        # that ProtectSystem=strict blocks), and systemd lets root start units.
        path = [ pkgs.iproute2 pkgs.iptables pkgs.kmod config.systemd.package ];
        environment.CNISHIFT_ROLLBACK_COMMAND = cfg.rollback.command;
        environment.CNISHIFT_ETCD_SNAPSHOT_COMMAND = cfg.etcdSnapshot.command;
        serviceConfig = {
          ExecStart = lib.escapeShellArgs ([ "${cfg.package}/bin/cnishift-agent" ] ++ serveArgs);
          Restart = "on-failure";
          RestartSec = "5s";
          # systemd creates the state directory when it is under /var/lib;
          # elsewhere it must exist and is made writable below.
          StateDirectory = mkIf stateUnderVarLib (lib.removePrefix "/var/lib/" cfg.stateDir);
          StateDirectoryMode = "0700";
          LoadCredential = [
            "ca.pem:${cfg.tls.caFile}"
            "cert.pem:${cfg.tls.certFile}"
            "key.pem:${cfg.tls.keyFile}"
          ];
          # Hardening. Each capability is here for a reason:
          #   CAP_BPF, CAP_PERFMON  load the test programs and maps the eBPF probes need
          #   CAP_SYS_ADMIN         bpf() on kernels older than 5.8, and reading bpffs/cgroup2 mounts
          #   CAP_NET_ADMIN         remove Flannel's interfaces, routes and iptables chains; set net sysctls
          #   CAP_SYS_MODULE        remediation loads missing modules (modprobe)
          #   CAP_DAC_READ_SEARCH   read /proc/config.gz and k3s's files owned by root, among them the
          #                         etcd client certificates and keys (0600) under
          #                         /var/lib/rancher/k3s/server/tls/etcd that the etcd check uses
          #                         (reading needs no writable path; the client port is AF_INET)
          CapabilityBoundingSet = [ "CAP_BPF" "CAP_PERFMON" "CAP_SYS_ADMIN" "CAP_NET_ADMIN" "CAP_SYS_MODULE" "CAP_DAC_READ_SEARCH" ];
          NoNewPrivileges = true;
          ProtectSystem = "strict";
          ProtectHome = true;
          PrivateTmp = true;
          ReadWritePaths = cleanupPaths ++ lib.optional (!stateUnderVarLib) cfg.stateDir;
          ProtectKernelTunables = false; # remediation writes net sysctls
          ProtectKernelModules = false; # remediation loads modules
          RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_NETLINK" "AF_UNIX" ];
          LockPersonality = true;
          RestrictRealtime = true;
          SystemCallArchitectures = "native";
        };
      };
      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall [ cfg.port ];

      # The dead-man rollback runs here, not in the agent's unit: the agent's
      # unit cannot change the system (ProtectSystem=strict), and
      # switch-to-configuration may restart cnishift-agent.service, which would
      # kill a child of the agent half-way through. The instance (%i) is the
      # generation number; the agent starts it with its rollback command
      # (`systemctl start --wait`), and the unit's result is the outcome.
      # Not hardened (it switches the whole system), not wanted by any target:
      # it runs only when the agent starts it.
      systemd.services."cnishift-rollback@" = {
        description = "cnishift dead-man rollback to NixOS system generation %i";
        # The switch this unit runs must not restart the unit running it.
        restartIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${cfg.rollback.script} %i";
          # A hung activation ends as a failed unit, which the agent reports. Shorter than
          # the agent's own bound on the command (--rollback-timeout, 5 min by default), so
          # `systemctl start --wait` returns the unit's result before the agent gives up.
          TimeoutStartSec = "4min";
        };
      };

      # The etcd snapshot runs here, not in the agent's unit, for the same
      # reason: k3s writes under /var/lib/rancher/k3s/server/db/snapshots, which
      # ProtectSystem=strict keeps read-only to the agent, and widening the
      # agent's writable paths for one command would last for its whole life.
      # The instance (%i, the raw instance name) is the run id.
      systemd.services."cnishift-etcd-snapshot@" = {
        description = "cnishift: etcd snapshot cnishift-pre-%i before the migration";
        restartIfChanged = false;
        serviceConfig = {
          Type = "oneshot";
          ExecStart = "${cfg.etcdSnapshot.script} %i";
          TimeoutStartSec = "${toString (cfg.etcdSnapshot.timeout - 10)}s";
        };
      };
    })

    (mkIf prereq.enable {
      boot.kernelModules = [ "xt_socket" "xt_mark" "xt_conntrack" "br_netfilter" "overlay" ];
      boot.kernel.sysctl = {
        "net.ipv4.ip_forward" = 1;
        "net.ipv4.conf.all.forwarding" = 1;
        "net.bridge.bridge-nf-call-iptables" = 1;
        # systemd's default rp_filter=2 drops Cilium's pod traffic.
        "net.ipv4.conf.all.rp_filter" = 0;
        "net.ipv4.conf.default.rp_filter" = 0;
      };
      fileSystems."/sys/fs/bpf" = {
        device = "bpffs";
        fsType = "bpf";
        options = [ "rw" "nosuid" "nodev" "noexec" "relatime" "mode=700" ];
      };
      # Only servers carry these flags; agents follow their server.
      services.k3s.extraFlags = mkIf (config.services.k3s.role == "server") [
        "--flannel-backend=none"
        "--disable-network-policy"
      ];
    })
  ];
}
