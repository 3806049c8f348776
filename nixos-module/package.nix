# The cnishift workspace: bin/cnishift-agent and bin/cnishift.
{ lib, rustPlatform, protobuf, pkg-config }:

rustPlatform.buildRustPackage {
  pname = "cnishift";
  version = "0.1.0";

  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: _type: !(lib.hasInfix "/target" path) && !(lib.hasInfix "/.git" path);
  };

  cargoLock.lockFile = ../Cargo.lock;

  # tonic-prost-build runs protoc at build time.
  nativeBuildInputs = [ protobuf pkg-config ];

  cargoBuildFlags = [ "-p" "cnishift-agent" "-p" "cnishift" ];
  # The tests need root, network namespaces and ../shared; CI runs them.
  doCheck = false;

  meta = {
    description = "Move a k3s cluster from Flannel to Cilium, node by node";
    license = lib.licenses.asl20;
    mainProgram = "cnishift";
    platforms = [ "x86_64-linux" "aarch64-linux" ];
  };
}
