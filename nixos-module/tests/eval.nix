# Evaluation tests for module.nix, run by nixpkgs' own module system:
# `lib.evalModules` from the real nixpkgs `lib` (../shared/vendor/nixpkgs-lib/lib
# beside the repository; its commit is in ../SOURCE), so mkIf/mkMerge/mkDefault,
# the types' checks, merges and error messages are the real ones. The NixOS
# options the module sets are declared in nixos-options.nix with the types
# NixOS gives them; `pkgs` is a stub (below). The flake's VM test, which
# evaluates and boots the module with NixOS itself, is the full check.
#
#   nix-instantiate --eval --strict --json --store dummy:// nixos-module/tests/eval.nix -A summary
#
# `summary` is { line = "N passed, N failed (nixpkgs lib ...)"; passed; failed; failures; lib; }.
# `case.<name>` evaluates a configuration that must be refused (the error names
# the option); `check.<name>` forces one good configuration's generated NixOS
# config (a module with a planted type error must fail there); `execStart` is
# the agent's ExecStart of a typical configuration and `rollbackScript` the
# rollback unit's script text (both run by the cargo test nixos_module).
{ modulePath ? ../module.nix
, nixpkgsLib ? ../../../shared/vendor/nixpkgs-lib/lib
}:

let
  inherit (builtins) isAttrs isList attrNames all any filter mapAttrs tryEval deepSeq elem;

  lib =
    if builtins.pathExists (nixpkgsLib + "/default.nix") then import nixpkgsLib
    else
      throw ''
        nixpkgs' lib not found at ${toString nixpkgsLib}: these tests evaluate the module with
        nixpkgs' own lib.evalModules, expected at ../shared/vendor/nixpkgs-lib/lib beside the
        repository (pass another with --arg nixpkgsLib /path/to/nixpkgs/lib)'';
  source = nixpkgsLib + "/../SOURCE";
  commit =
    let m = builtins.match "(.|\n)*commit ([0-9a-f]{40})(.|\n)*" (builtins.readFile source); in
    if builtins.pathExists source && m != null then builtins.elemAt m 1
    else throw "${toString source} is missing or names no commit: which nixpkgs lib is this?";
  libVersion = "nixpkgs lib ${lib.version} (release ${lib.trivial.release}, nix-community/nixpkgs.lib ${commit})";

  # A stub for pkgs: only what module.nix uses, as derivation-like attribute
  # sets (type = "derivation" and a store outPath, which lib.types.package
  # accepts). Nothing is built: writeShellScript keeps its text for the tests.
  drv = name: { type = "derivation"; inherit name; outPath = "/nix/store/00000000000000000000000000000000-${name}"; };
  pkgs = {
    callPackage = _path: _args: drv "cnishift-0.1.0";
    iproute2 = drv "iproute2";
    iptables = drv "iptables";
    kmod = drv "kmod";
    coreutils = drv "coreutils";
    systemd = drv "systemd";
    nix = drv "nix";
    k3s = drv "k3s";
    writeShellScript = name: text: drv name // { inherit text; };
  };

  # One NixOS-like evaluation: the module, the NixOS option declarations and
  # the definitions given (a module or a list of modules).
  eval = defs:
    (lib.evalModules {
      modules = [ ./nixos-options.nix modulePath { _module.args.pkgs = pkgs; } ] ++ lib.toList defs;
    }).config;

  # What the module generates for the rest of NixOS (the module's own options
  # are left out: an unset required one must not fail a disabled config).
  generated = c: {
    inherit (c) systemd networking boot fileSystems nix;
    k3s = c.services.k3s;
  };

  tls = {
    caFile = "/run/secrets/cnishift/ca.pem";
    certFile = "/run/secrets/cnishift/node.pem";
    keyFile = "/run/secrets/cnishift/node-key.pem";
  };
  agentOn = extra: { services.cnishift-agent = { enable = true; inherit tls; } // extra; };
  # Accessors never fail: a missing attribute makes a test false, not the run
  # abort (tryEval only catches throw and assert).
  units = c: c.systemd.services or { };
  svc = c: (units c).cnishift-agent or { serviceConfig = { }; };
  sc = c: (svc c).serviceConfig or { };
  exec = c: (sc c).ExecStart or "";
  rollbackUnit = c: (units c)."cnishift-rollback@" or { serviceConfig = { }; };
  rsc = c: (rollbackUnit c).serviceConfig or { };
  rollbackEnv = c: (svc c).environment.CNISHIFT_ROLLBACK_COMMAND or "";
  scriptOf = c: c.services.cnishift-agent.rollback.script;
  snapshotUnit = c: (units c)."cnishift-etcd-snapshot@" or { serviceConfig = { }; };
  ssc = c: (snapshotUnit c).serviceConfig or { };
  snapshotEnv = c: (svc c).environment.CNISHIFT_ETCD_SNAPSHOT_COMMAND or "";
  snapshotScriptOf = c: c.services.cnishift-agent.etcdSnapshot.script;
  hasWord = w: s: builtins.match ".*(^| )${w}( |$).*" s != null;
  contains = needle: s: lib.hasInfix needle s;

  # The agent unit's privileges before the rollback unit existed: the
  # rollback must not widen them.
  agentCapabilities = [ "CAP_BPF" "CAP_PERFMON" "CAP_SYS_ADMIN" "CAP_NET_ADMIN" "CAP_SYS_MODULE" "CAP_DAC_READ_SEARCH" ];
  agentWritable = [
    "/etc/cni/net.d"
    "/var/lib/rancher/k3s/agent/etc/cni/net.d"
    "/var/lib/rancher/k3s/agent/etc/flannel"
    "/run/flannel"
    "/var/lib/cni"
  ];
  overriddenRollback = "/usr/local/bin/roll-back --to {generation} --node {node}";

  configs = {
    disabled = eval { };
    defaults = eval (agentOn { });
    firewall = eval (agentOn { openFirewall = true; port = 9443; });
    named = eval ({ networking.hostName = "raccoon03"; } // agentOn { });
    renamed = eval ({ networking.hostName = "raccoon03"; } // agentOn { nodeName = "r3"; });
    stateElsewhere = eval (agentOn { stateDir = "/srv/cnishift"; });
    prereqServer = eval { services.cnishift.ciliumPrerequisites.enable = true; };
    prereqAgent = eval { services.k3s.role = "agent"; services.cnishift.ciliumPrerequisites.enable = true; };
    both = eval [{ services.cnishift.ciliumPrerequisites.enable = true; } (agentOn { })];
    rollbackOverride = eval (agentOn { rollback.command = overriddenRollback; });
    otherNix = eval [ (agentOn { }) { nix.package = drv "nix-2.31.2"; } ];
    snapshotOverride = eval (agentOn { etcdSnapshot = { command = "/usr/local/bin/snap {run} {node}"; timeout = 600; }; });
    otherK3s = eval [ (agentOn { }) { services.k3s.package = drv "k3s-1.33.1"; } ];
  };

  # Definitions that must be refused, naming the option.
  bad = {
    badPort = agentOn { port = 70000; };
    relativeTls = { services.cnishift-agent = { enable = true; tls = tls // { caFile = "secrets/ca.pem"; }; }; };
    unknownOption = agentOn { prot = 1; };
    wrongType = agentOn { openFirewall = "yes"; };
    # Declared NixOS options, checked by NixOS's types:
    sysctlList = { services.cnishift.ciliumPrerequisites.enable = true; boot.kernel.sysctl."net.core.somaxconn" = [ 4096 ]; };
    hostNameWithDomain = agentOn { } // { networking.hostName = "opi01.lan"; };
    rollbackScriptSet = agentOn { rollback.script = drv "elsewhere"; };
    snapshotTimeoutTooShort = agentOn { etcdSnapshot.timeout = 5; };
    snapshotScriptSet = agentOn { etcdSnapshot.script = drv "elsewhere"; };
  };

  # Anything still shaped like an mkIf/mkMerge/mkOverride in the generated
  # config has leaked (the module system did not resolve it).
  leaks = v:
    if isAttrs v then (v ? _type && !(v ? outPath)) || (!(v ? outPath) && any (n: leaks v.${n}) (attrNames v))
    else if isList v then any leaks v
    else false;
  nonNull = lib.filterAttrs (_: v: v != null);

  c = configs;
  tests = {
    "disabled generates nothing" =
      units c.disabled == { } && c.disabled.networking.firewall.allowedTCPPorts == [ ]
        && c.disabled.boot.kernelModules == [ ] && nonNull c.disabled.boot.kernel.sysctl == { }
        && c.disabled.fileSystems == { } && c.disabled.services.k3s.extraFlags == [ ];
    "nothing leaks (no unresolved mkIf anywhere)" = !(any (n: leaks (generated c.${n})) (attrNames c));
    "default port 7443 in ExecStart" = hasWord "0.0.0.0:7443" (exec c.defaults);
    "ExecStart runs the package's agent" = hasWord "/nix/store/00000000000000000000000000000000-cnishift-0.1.0/bin/cnishift-agent" (exec c.defaults);
    "ExecStart has every serve flag" = all (f: hasWord f (exec c.defaults)) [
      "serve"
      "--listen"
      "--node-name"
      "--coordinator-identity"
      "--state-dir"
      "--tls-ca"
      "--tls-cert"
      "--tls-key"
    ];
    "TLS files come from credentials, not the store" =
      hasWord "%d/ca.pem" (exec c.defaults) && hasWord "%d/key.pem" (exec c.defaults)
        && (sc c.defaults).LoadCredential or [ ] == [
        "ca.pem:/run/secrets/cnishift/ca.pem"
        "cert.pem:/run/secrets/cnishift/node.pem"
        "key.pem:/run/secrets/cnishift/node-key.pem"
      ];
    "node name defaults to the host name" = hasWord "raccoon03" (exec c.named) && hasWord "opi01" (exec c.defaults);
    "node name can be set" = hasWord "r3" (exec c.renamed) && !(hasWord "raccoon03" (exec c.renamed));
    "coordinator identity default" = hasWord "cnishift-coordinator" (exec c.defaults);
    "firewall closed by default" = c.defaults.networking.firewall.allowedTCPPorts == [ ];
    "openFirewall opens the configured port" = c.firewall.networking.firewall.allowedTCPPorts == [ 9443 ] && hasWord "0.0.0.0:9443" (exec c.firewall);
    "restart on failure" = (sc c.defaults).Restart or "" == "on-failure";
    "state directory under /var/lib" = (sc c.defaults).StateDirectory or "" == "cnishift-agent" && hasWord "/var/lib/cnishift-agent" (exec c.defaults);
    "state directory elsewhere is made writable" =
      !((sc c.stateElsewhere) ? StateDirectory)
        && elem "/srv/cnishift" ((sc c.stateElsewhere).ReadWritePaths or [ ]);
    "PATH has iproute2, iptables, kmod and systemd (systemctl)" = map (p: p.name) ((svc c.defaults).path or [ ]) == [ "iproute2" "iptables" "kmod" "systemd" ];
    "hardening" =
      let s = sc c.defaults; in
      s.ProtectSystem or "" == "strict" && s.ProtectHome or false && s.NoNewPrivileges or false
        && all (cap: elem cap (s.CapabilityBoundingSet or [ ])) [ "CAP_NET_ADMIN" "CAP_BPF" "CAP_PERFMON" ]
        && !(elem "CAP_SYS_PTRACE" (s.CapabilityBoundingSet or [ ]))
        && elem "/etc/cni/net.d" (s.ReadWritePaths or [ ]);
    "the agent unit gains no capability or writable path for the rollback" =
      let s = sc c.defaults; in
      s.CapabilityBoundingSet or [ ] == agentCapabilities && s.ReadWritePaths or [ ] == agentWritable
        && elem "AF_UNIX" (s.RestrictAddressFamilies or [ ]) && s.ProtectSystem or "" == "strict";
    "rollback command defaults to the rollback unit" =
      rollbackEnv c.defaults == "systemctl start --wait cnishift-rollback@{generation}.service";
    "rollback command can be overridden" = rollbackEnv c.rollbackOverride == overriddenRollback;
    "the agent unit does not run the rollback itself" =
      let s = sc c.defaults; in
      !(any (k: contains "switch-to-configuration" (toString (s.${k} or "")) || contains "nix-env" (toString (s.${k} or "")))
        [ "ExecStart" "ExecStartPre" "ExecStartPost" "ExecStop" "ExecStopPost" ])
      && !(contains "switch-to-configuration" (rollbackEnv c.defaults));
    "rollback unit: a oneshot template" = (units c.defaults) ? "cnishift-rollback@" && (rsc c.defaults).Type or "" == "oneshot";
    "rollback unit: ExecStart is its script with the instance (%i)" =
      (rsc c.defaults).ExecStart or "" == "${(scriptOf c.defaults).outPath} %i"
        && (scriptOf c.defaults).name == "cnishift-rollback";
    "rollback unit: not started at boot" =
      let u = rollbackUnit c.defaults; in
      u.wantedBy or [ "?" ] == [ ] && u.requiredBy or [ "?" ] == [ ]
        && !(any (n: any (x: lib.hasPrefix "cnishift-rollback@" x) ((units c.defaults).${n}.wants ++ (units c.defaults).${n}.requires))
        (attrNames (units c.defaults)));
    "rollback unit: not hardened like the agent" =
      let s = rsc c.defaults; in
      all (k: !(s ? ${k})) [ "ProtectSystem" "CapabilityBoundingSet" "NoNewPrivileges" "ReadWritePaths" "PrivateTmp" "ProtectHome" ];
    "rollback unit: bounded, within the agent's 5 min" = elem ((rsc c.defaults).TimeoutStartSec or "") [ "4min" "240" "240s" ];
    "rollback unit: not restarted by the switch it runs" = (rollbackUnit c.defaults).restartIfChanged or true == false;
    "rollback unit: only with the agent" = !((units c.disabled) ? "cnishift-rollback@") && !((units c.prereqServer) ? "cnishift-rollback@");
    "rollback script: refuses anything but digits, first" =
      let t = (scriptOf c.defaults).text or ""; in
      contains "*[!0-9]*)" t && lib.hasPrefix "set -eu\n" t
        && builtins.length (lib.splitString "*[!0-9]*)" (builtins.head (lib.splitString "nix-env" t))) == 2;
    "rollback script: sets the system profile back, then switches" =
      let t = (scriptOf c.defaults).text or ""; in
      contains "/nix/var/nix/profiles/system-$generation-link" t
        && contains "/nix/store/00000000000000000000000000000000-nix/bin/nix-env --profile /nix/var/nix/profiles/system --set \"$system\"\nexec \"$system/bin/switch-to-configuration\" switch" t;
    "rollback script: nix from nix.package" = contains "-nix-2.31.2/bin/nix-env " ((scriptOf c.otherNix).text or "");
    "etcd snapshot command defaults to the snapshot unit" =
      snapshotEnv c.defaults == "systemctl start --wait cnishift-etcd-snapshot@{run}.service";
    "etcd snapshot command and bound can be set" =
      snapshotEnv c.snapshotOverride == "/usr/local/bin/snap {run} {node}"
        && contains "--etcd-snapshot-timeout 600s" (exec c.snapshotOverride)
        && (ssc c.snapshotOverride).TimeoutStartSec or "" == "590s";
    "ExecStart bounds the snapshot (120 s by default)" = contains "--etcd-snapshot-timeout 120s" (exec c.defaults);
    "snapshot unit: a oneshot template running its script with the raw instance (%i)" =
      (ssc c.defaults).Type or "" == "oneshot"
        && (ssc c.defaults).ExecStart or "" == "${(snapshotScriptOf c.defaults).outPath} %i"
        && (snapshotScriptOf c.defaults).name == "cnishift-etcd-snapshot";
    "snapshot unit: bounded inside the agent's bound" = (ssc c.defaults).TimeoutStartSec or "" == "110s";
    "snapshot unit: not started at boot, not restarted by a switch, only with the agent" =
      let u = snapshotUnit c.defaults; in
      u.wantedBy or [ "?" ] == [ ] && u.restartIfChanged or true == false
        && !((units c.disabled) ? "cnishift-etcd-snapshot@") && !((units c.prereqServer) ? "cnishift-etcd-snapshot@");
    "snapshot unit: not hardened like the agent (k3s writes its snapshot directory)" =
      let s = ssc c.defaults; in
      all (k: !(s ? ${k})) [ "ProtectSystem" "CapabilityBoundingSet" "NoNewPrivileges" "ReadWritePaths" ];
    "snapshot script: checks the run id first, then runs k3s's etcd-snapshot save" =
      let t = (snapshotScriptOf c.defaults).text or ""; in
      lib.hasPrefix "set -eu\n" t && contains "*[!A-Za-z0-9._-]*)" t
        && builtins.length (lib.splitString "*[!A-Za-z0-9._-]*)" (builtins.head (lib.splitString "etcd-snapshot save" t))) == 2
        && contains "exec /nix/store/00000000000000000000000000000000-k3s/bin/k3s etcd-snapshot save --name \"cnishift-pre-$run\"" t;
    "snapshot script: k3s from services.k3s.package" = contains "-k3s-1.33.1/bin/k3s " ((snapshotScriptOf c.otherK3s).text or "");
    "prerequisites: kernel modules" = c.prereqServer.boot.kernelModules == [ "xt_socket" "xt_mark" "xt_conntrack" "br_netfilter" "overlay" ];
    "prerequisites: sysctls" =
      let s = c.prereqServer.boot.kernel.sysctl; in
      s."net.ipv4.ip_forward" or 0 == 1 && s."net.ipv4.conf.all.forwarding" or 0 == 1
        && s."net.bridge.bridge-nf-call-iptables" or 0 == 1 && s."net.ipv4.conf.all.rp_filter" or 1 == 0
        && s."net.ipv4.conf.default.rp_filter" or 1 == 0;
    "prerequisites: bpffs at /sys/fs/bpf" =
      let f = c.prereqServer.fileSystems."/sys/fs/bpf" or { }; in
      f.fsType or "" == "bpf" && f.device or "" == "bpffs" && f.mountPoint or "" == "/sys/fs/bpf";
    "prerequisites: k3s server flags" = c.prereqServer.services.k3s.extraFlags == [ "--flannel-backend=none" "--disable-network-policy" ];
    "prerequisites: no k3s flags on an agent node" = c.prereqAgent.services.k3s.extraFlags == [ ] && c.prereqAgent.boot.kernelModules != [ ];
    "prerequisites alone do not start the agent" = units c.prereqServer == { };
    "both together merge" = (units c.both) ? cnishift-agent && c.both.services.k3s.extraFlags != [ ];
  } // mapAttrs (_: defs: !(tryEval (deepSeq (generated (eval defs)) true)).success) (
    lib.mapAttrs' (n: v: lib.nameValuePair "refused: ${n}" v) bad
  );

  results = mapAttrs (_: t: (tryEval t).value or false) tests;
  failures = filter (n: results.${n} != true) (attrNames results);
  passed = builtins.length (attrNames results) - builtins.length failures;
  failed = builtins.length failures;
in
{
  summary = {
    inherit passed failed failures;
    lib = libVersion;
    line = "${toString passed} passed, ${toString failed} failed with ${libVersion}";
  };
  case = mapAttrs (_: defs: deepSeq (generated (eval defs)) "evaluated") bad;
  check = mapAttrs (_: cfg: deepSeq (generated cfg) "evaluated") configs;
  execStart = exec configs.defaults;
  rollbackScript = (scriptOf configs.defaults).text;
}
