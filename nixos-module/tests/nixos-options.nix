# The NixOS options module.nix sets or reads but does not declare, declared
# here with nixpkgs' real `lib.types` and the types NixOS gives them, so that
# `lib.evalModules` type-checks and merges the module's definitions the way a
# NixOS system would. Written for these tests (no NixOS code is copied); each
# option names the NixOS file whose declaration it mirrors. Only the type, the
# default and what the merge does matter here: NixOS's implementation of these
# options (units on disk, the firewall script, sysctl.d, ...) is not mirrored,
# nor the defaults other NixOS modules add (a service's default PATH, say).
# The flake's VM test evaluates the module with NixOS itself.
{ lib, pkgs, ... }:

let
  inherit (lib) mkOption types;

  # nixos/lib/systemd-lib.nix: a unit name with one of systemd's unit suffixes.
  unitName = types.strMatching "[a-zA-Z0-9@%:_.\\-]+[.](service|socket|device|mount|automount|swap|target|path|timer|scope|slice)";
  unitNames = mkOption { type = types.listOf unitName; default = [ ]; };

  # nixos/lib/systemd-unit-options.nix (unitOption): any value; definitions
  # that are lists are concatenated, anything else must be defined once (or
  # equally). Like NixOS's, this merge does not look inside the lists, so an
  # mkIf placed in one stays in the unit as an attribute set.
  unitOption = types.mkOptionType {
    name = "systemd option";
    merge = loc: defs:
      let kept = lib.filterOverrides defs; in
      if lib.any (d: builtins.isList d.value) kept
      then lib.concatMap (d: lib.toList d.value) kept
      else lib.mergeEqualOption loc kept;
  };

  # nixos/lib/systemd-unit-options.nix (serviceOptions.serviceConfig): NixOS
  # checks Type= and Restart= against systemd's values.
  serviceTypes = [ "exec" "simple" "forking" "oneshot" "dbus" "notify" "notify-reload" "idle" ];
  restartValues = [ "no" "on-success" "on-failure" "on-abnormal" "on-abort" "always" ];
  knownValue = allowed: cfg: name: !(cfg ? ${name}) || builtins.elem cfg.${name} allowed;
  serviceSection = types.addCheck (types.attrsOf unitOption)
    (cfg: knownValue serviceTypes cfg "Type" && knownValue restartValues cfg "Restart");

  # nixos/lib/systemd-unit-options.nix (sharedOptions, commonUnitOptions,
  # serviceOptions, stage2ServiceOptions): the options of one service that
  # module.nix uses, with NixOS's types and defaults.
  service = types.submodule {
    options = {
      enable = mkOption { type = types.bool; default = true; };
      description = mkOption { type = types.singleLineStr; default = ""; };
      wantedBy = unitNames;
      requiredBy = unitNames;
      after = unitNames;
      before = unitNames;
      wants = unitNames;
      requires = unitNames;
      unitConfig = mkOption { type = types.attrsOf unitOption; default = { }; };
      serviceConfig = mkOption { type = serviceSection; default = { }; };
      environment = mkOption {
        type = types.attrsOf (types.nullOr (types.oneOf [ types.str types.path types.package ]));
        default = { };
      };
      path = mkOption { type = types.listOf (types.oneOf [ types.package types.str ]); default = [ ]; };
      script = mkOption { type = types.lines; default = ""; };
      restartIfChanged = mkOption { type = types.bool; default = true; };
      stopIfChanged = mkOption { type = types.bool; default = true; };
    };
  };

  # nixos/modules/config/sysctl.nix: a sysctl value is a bool, string, int or
  # null (an mkOverride of one included); more than one definition with the
  # same priority is a conflict.
  sysctlValue = types.mkOptionType {
    name = "sysctl option value";
    check = v:
      let scalar = x: builtins.isBool x || builtins.isString x || builtins.isInt x || x == null; in
      scalar v || ((v._type or "") == "override" && scalar v.content);
    merge = loc: defs: lib.mergeOneOption loc (lib.filterOverrides defs);
  };
  # nixos/modules/config/sysctl.nix: the two buffer sizes NixOS declares take
  # the highest of their definitions.
  highest = types.nullOr (types.ints.unsigned // {
    merge = _loc: defs: lib.foldl (a: d: if d.value == null then null else lib.max a d.value) 0 (lib.filterOverrides defs);
  });

  # nixos/modules/tasks/filesystems.nix: non-empty strings, a mount point
  # without a trailing slash.
  nonEmpty = s: builtins.match "[ \t\n]*" s == null;
  nonEmptyStr = types.addCheck types.str nonEmpty // { description = "string (with check: non-empty)"; };
  mountPointStr = types.addCheck types.str (s: nonEmpty s && builtins.match ".+/" s == null)
    // { description = "string (with check: non-empty without trailing slash)"; };
  fileSystem = types.submodule ({ name, ... }: {
    options = {
      mountPoint = mkOption { type = mountPointStr; default = name; };
      device = mkOption { type = types.nullOr nonEmptyStr; default = null; };
      fsType = mkOption { type = nonEmptyStr; default = "auto"; };
      options = mkOption { type = types.nonEmptyListOf nonEmptyStr; default = [ "defaults" ]; };
    };
  });
in
{
  options = {
    # nixos/modules/system/boot/systemd.nix
    systemd.services = mkOption { type = types.attrsOf service; default = { }; };
    # nixos/modules/system/boot/systemd.nix (mkPackageOption pkgs "systemd")
    systemd.package = mkOption { type = types.package; default = pkgs.systemd; };

    # nixos/modules/services/networking/firewall.nix: NixOS sorts the ports
    # and drops duplicates.
    networking.firewall.allowedTCPPorts = mkOption {
      type = types.listOf types.port;
      default = [ ];
      apply = ports: lib.unique (builtins.sort builtins.lessThan ports);
    };

    # nixos/modules/tasks/network-interfaces.nix: a DNS label, or empty.
    # (NixOS defaults it to "nixos"; these tests name a node of the runbook.)
    networking.hostName = mkOption {
      type = types.strMatching "^$|^[[:alnum:]]([[:alnum:]_-]{0,61}[[:alnum:]])?$";
      default = "opi01";
    };

    # nixos/modules/system/boot/kernel.nix
    boot.kernelModules = mkOption { type = types.listOf types.str; default = [ ]; };

    # nixos/modules/config/sysctl.nix
    boot.kernel.sysctl = mkOption {
      type = types.submodule {
        freeformType = types.attrsOf sysctlValue;
        options."net.core.rmem_max" = mkOption { type = highest; default = null; };
        options."net.core.wmem_max" = mkOption { type = highest; default = null; };
      };
      default = { };
    };

    # nixos/modules/tasks/filesystems.nix
    fileSystems = mkOption { type = types.attrsOf fileSystem; default = { }; };

    # nixos/modules/services/cluster/k3s/default.nix
    services.k3s.enable = mkOption { type = types.bool; default = false; };
    services.k3s.role = mkOption { type = types.enum [ "server" "agent" ]; default = "server"; };
    services.k3s.extraFlags = mkOption { type = types.either types.str (types.listOf types.str); default = [ ]; };
    services.k3s.package = mkOption { type = types.package; default = pkgs.k3s; };

    # nixos/modules/config/nix.nix
    nix.package = mkOption { type = types.package; default = pkgs.nix; };

    # nixos/modules/config/system-path.nix (set by the flake's VM test node)
    environment.systemPackages = mkOption { type = types.listOf types.package; default = [ ]; };
  };
}
