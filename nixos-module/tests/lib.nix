# A stand-in for the few nixpkgs `lib` functions module.nix uses, so the module
# can be evaluated with Debian's nix-bin and no nixpkgs checkout. The shapes are
# nixpkgs' own: mkIf is { _type = "if"; condition; content; }, mkMerge is
# { _type = "merge"; contents; }, and a type has name, description and check.
# This is NOT the module system: eval.nix resolves these the way it would for
# the constructs module.nix uses. The flake's VM test is the full check.
let
  mkOptionType = { name, description ? name, check }: {
    _type = "option-type";
    inherit name description check;
  };
  stringLength = builtins.stringLength;
in
rec {
  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    description = "Whether to enable ${name}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };

  optionalAttrs = cond: as: if cond then as else { };
  optional = cond: x: if cond then [ x ] else [ ];
  hasPrefix = pre: s: builtins.substring 0 (stringLength pre) s == pre;
  removePrefix = pre: s: if hasPrefix pre s then builtins.substring (stringLength pre) (stringLength s) s else s;

  # As nixpkgs: safe words pass through, anything else is single-quoted.
  escapeShellArg = arg:
    let s = toString arg; in
    if builtins.match "[[:alnum:],._+:@%/-]+" s != null then s
    else "'${builtins.replaceStrings [ "'" ] [ "'\\''" ] s}'";
  escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);

  types = {
    bool = mkOptionType { name = "bool"; description = "boolean"; check = builtins.isBool; };
    str = mkOptionType { name = "str"; description = "string"; check = builtins.isString; };
    port = mkOptionType {
      name = "port";
      description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
      check = v: builtins.isInt v && v >= 0 && v <= 65535;
    };
    package = mkOptionType {
      name = "package";
      description = "package";
      check = v: builtins.isAttrs v && (v.type or null) == "derivation";
    };
    listOf = t: mkOptionType {
      name = "listOf";
      description = "list of ${t.description}";
      check = v: builtins.isList v && builtins.all t.check v;
    };
    nullOr = t: mkOptionType {
      name = "nullOr";
      description = "null or ${t.description}";
      check = v: v == null || t.check v;
    };
    addCheck = t: extra: t // { check = v: t.check v && extra v; };
  };
}
