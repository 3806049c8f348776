# Evaluation tests for module.nix with the stand-in lib (lib.nix).
#
#   nix-instantiate --eval --strict --json --store dummy:// nixos-module/tests/eval.nix -A summary
#
# `summary` is { line = "N passed, N failed"; passed; failed; failures; }.
# `case.<name>` forces one configuration's whole generated config (used to
# check that bad values fail with a message naming the option), and
# `execStart` is the ExecStart of a typical configuration (checked against the
# real agent's flags by the cargo test that runs this file).
{ modulePath ? ../module.nix }:

let
  lib = import ./lib.nix;
  module = import modulePath;
  inherit (builtins) isAttrs isList attrNames all any filter mapAttrs tryEval deepSeq;

  drv = name: { type = "derivation"; outPath = "/nix/store/00000000000000000000000000000000-${name}"; inherit name; };
  pkgs = {
    callPackage = _path: _args: drv "cnishift-0.1.0";
    iproute2 = drv "iproute2";
    iptables = drv "iptables";
    kmod = drv "kmod";
  };

  isOption = v: isAttrs v && (v._type or null) == "option";
  absent = { _type = "absent"; };
  isAbsent = v: isAttrs v && (v._type or null) == "absent";

  # The value of every declared option: the definition (type-checked) or the
  # default. Undeclared definitions are errors, as in the module system.
  optionValues = path: decls: defs:
    let
      unknown = filter (n: !(decls ? ${n})) (attrNames defs);
    in
    if unknown != [ ] then throw "The option `${path}${builtins.head unknown}' does not exist."
    else
      mapAttrs
        (name: decl:
          let p = "${path}${name}"; in
          if isOption decl then
            if defs ? ${name} then
              let v = defs.${name}; in
              if decl.type.check v then v
              else throw "A definition for option `${p}' is not of type `${decl.type.description}'. Definition value: ${builtins.toJSON v}"
            else if decl ? default then decl.default
            else throw "The option `${p}' is used but not defined."
          else optionValues "${p}." decl (defs.${name} or { }))
        decls;

  # Resolves mkIf/mkMerge where the module system pushes them down (attribute
  # values), drops what a false mkIf guards, and refuses properties anywhere
  # else (inside a list), which the real module system would not resolve.
  resolve = v:
    if isAttrs v && (v._type or null) == "if" then
      (if v.condition then resolve v.content else absent)
    else if isAttrs v && (v._type or null) == "merge" then
      builtins.foldl' merge { } (filter (x: !isAbsent x) (map resolve v.contents))
    else if isAttrs v && !(v ? outPath) then
      let
        r = mapAttrs (_: resolve) v;
        kept = builtins.removeAttrs r (filter (n: isAbsent r.${n}) (attrNames r));
      in
      # A set whose every definition was a false mkIf defines nothing.
      if kept == { } && r != { } then absent else kept
    else if isList v then
      (if any (x: isAttrs x && x ? _type) v then throw "an mkIf/mkMerge inside a list is never resolved: it would leak into the configuration" else v)
    else v;

  # Deep merge of two resolved configs: attrsets recursively, lists appended,
  # equal scalars kept, conflicting scalars an error.
  merge = a: b:
    a // mapAttrs
      (n: bv:
        if !(a ? ${n}) then bv
        else if isAttrs a.${n} && isAttrs bv && !(bv ? outPath) then merge a.${n} bv
        else if isList a.${n} && isList bv then a.${n} ++ bv
        else if a.${n} == bv then bv
        else throw "conflicting definitions for `${n}'")
      b;

  # Anything still shaped like a property after resolution has leaked.
  leaks = v:
    if isAttrs v then (v ? _type && !(v ? outPath)) || any (n: leaks v.${n}) (attrNames v)
    else if isList v then any leaks v
    else false;

  # What the rest of NixOS provides that the module reads.
  externalDecls = {
    networking.hostName = lib.mkOption { type = lib.types.str; default = "opi01"; };
    services.k3s.role = lib.mkOption { type = lib.types.str; default = "server"; };
  };

  eval = defs:
    let
      m = module { inherit config lib pkgs; };
      config = optionValues "" (merge externalDecls m.options) defs;
    in
    resolve m.config;

  tls = {
    caFile = "/run/secrets/cnishift/ca.pem";
    certFile = "/run/secrets/cnishift/node.pem";
    keyFile = "/run/secrets/cnishift/node-key.pem";
  };
  agentOn = extra: { services.cnishift-agent = { enable = true; inherit tls; } // extra; };
  # Accessors never fail: a missing attribute makes a test false, not the run
  # abort (tryEval only catches throw and assert).
  svc = c: c.systemd.services.cnishift-agent or { serviceConfig = { }; };
  sc = c: (svc c).serviceConfig or { };
  exec = c: (sc c).ExecStart or "";
  hasWord = w: s: builtins.match ".*(^| )${w}( |$).*" s != null;

  configs = {
    disabled = eval { };
    defaults = eval (agentOn { });
    firewall = eval (agentOn { openFirewall = true; port = 9443; });
    named = eval ({ networking.hostName = "raccoon03"; } // agentOn { });
    renamed = eval ({ networking.hostName = "raccoon03"; } // agentOn { nodeName = "r3"; });
    stateElsewhere = eval (agentOn { stateDir = "/srv/cnishift"; });
    prereqServer = eval { services.cnishift.ciliumPrerequisites.enable = true; };
    prereqAgent = eval { services.k3s.role = "agent"; services.cnishift.ciliumPrerequisites.enable = true; };
    both = eval (merge { services.cnishift.ciliumPrerequisites.enable = true; } (agentOn { }));
  };

  # Definitions that must be refused, naming the option.
  bad = {
    badPort = agentOn { port = 70000; };
    relativeTls = { services.cnishift-agent = { enable = true; tls = tls // { caFile = "secrets/ca.pem"; }; }; };
    unknownOption = agentOn { prot = 1; };
    wrongType = agentOn { openFirewall = "yes"; };
  };

  c = configs;
  tests = {
    "disabled generates nothing" = c.disabled == { };
    "nothing leaks (no unresolved mkIf anywhere)" = !(any (n: leaks c.${n}) (attrNames c));
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
    "firewall closed by default" = !(c.defaults ? networking);
    "openFirewall opens the configured port" = c.firewall.networking.firewall.allowedTCPPorts or [ ] == [ 9443 ] && hasWord "0.0.0.0:9443" (exec c.firewall);
    "restart on failure" = (sc c.defaults).Restart or "" == "on-failure";
    "state directory under /var/lib" = (sc c.defaults).StateDirectory or "" == "cnishift-agent" && hasWord "/var/lib/cnishift-agent" (exec c.defaults);
    "state directory elsewhere is made writable" =
      !((sc c.stateElsewhere) ? StateDirectory)
        && builtins.elem "/srv/cnishift" ((sc c.stateElsewhere).ReadWritePaths or [ ]);
    "PATH has iproute2, iptables and kmod" = map (p: p.name) ((svc c.defaults).path or [ ]) == [ "iproute2" "iptables" "kmod" ];
    "hardening" =
      let s = sc c.defaults; in
      s.ProtectSystem or "" == "strict" && s.ProtectHome or false && s.NoNewPrivileges or false
        && all (cap: builtins.elem cap (s.CapabilityBoundingSet or [ ])) [ "CAP_NET_ADMIN" "CAP_BPF" "CAP_PERFMON" ]
        && !(builtins.elem "CAP_SYS_PTRACE" (s.CapabilityBoundingSet or [ ]))
        && builtins.elem "/etc/cni/net.d" (s.ReadWritePaths or [ ]);
    "rollback command defaults to the armed generation" =
      (svc c.defaults).environment.CNISHIFT_ROLLBACK_COMMAND or "" == "{armed_system}/bin/switch-to-configuration switch";
    "prerequisites: kernel modules" = c.prereqServer.boot.kernelModules or [ ] == [ "xt_socket" "xt_mark" "xt_conntrack" "br_netfilter" "overlay" ];
    "prerequisites: sysctls" =
      let s = c.prereqServer.boot.kernel.sysctl or { }; in
      s."net.ipv4.ip_forward" or 0 == 1 && s."net.ipv4.conf.all.forwarding" or 0 == 1
        && s."net.bridge.bridge-nf-call-iptables" or 0 == 1 && s."net.ipv4.conf.all.rp_filter" or 1 == 0;
    "prerequisites: bpffs at /sys/fs/bpf" = c.prereqServer.fileSystems."/sys/fs/bpf".fsType or "" == "bpf";
    "prerequisites: k3s server flags" = c.prereqServer.services.k3s.extraFlags or [ ] == [ "--flannel-backend=none" "--disable-network-policy" ];
    "prerequisites: no k3s flags on an agent node" = !(c.prereqAgent ? services) && c.prereqAgent.boot.kernelModules or [ ] != [ ];
    "prerequisites alone do not start the agent" = !(c.prereqServer ? systemd);
    "both together merge" = c.both ? systemd && c.both.services.k3s.extraFlags or [ ] != [ ];
  } // mapAttrs (_: defs: !(tryEval (deepSeq (eval defs) true)).success) (
    builtins.listToAttrs (map (n: { name = "refused: ${n}"; value = bad.${n}; }) (attrNames bad))
  );

  results = mapAttrs (_: t: (tryEval t).value or false) tests;
  failures = filter (n: results.${n} != true) (attrNames results);
  passed = builtins.length (attrNames results) - builtins.length failures;
  failed = builtins.length failures;
in
{
  summary = {
    inherit passed failed failures;
    line = "${toString passed} passed, ${toString failed} failed";
  };
  case = mapAttrs (_: defs: deepSeq (eval defs) "evaluated") bad;
  execStart = exec configs.defaults;
}
