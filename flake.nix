{
  description = "cnishift: move a k3s cluster from Flannel to Cilium, node by node";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAll (pkgs: rec {
        cnishift = pkgs.callPackage ./nixos-module/package.nix { };
        default = cnishift;
      });

      nixosModules.default = ./nixos-module/module.nix;

      # The full check (needs Nix with KVM): a VM running the agent, asked for
      # its report over mutual TLS by the coordinator binary.
      checks = forAll (pkgs: {
        agent-vm = pkgs.testers.runNixOSTest {
          name = "cnishift-agent";
          nodes.node = { pkgs, ... }: {
            imports = [ self.nixosModules.default ];
            networking.hostName = "node";
            services.cnishift.ciliumPrerequisites.enable = true;
            services.cnishift-agent = {
              enable = true;
              package = self.packages.${pkgs.system}.default;
              tls = { caFile = "/etc/cnishift/ca.pem"; certFile = "/etc/cnishift/node.pem"; keyFile = "/etc/cnishift/node-key.pem"; };
            };
            environment.systemPackages = [ self.packages.${pkgs.system}.default ];
          };
          testScript = ''
            node.succeed("mkdir -p /etc/cnishift /root/pki")
            node.succeed("cd /root && cnishift certs init --dir pki && cnishift certs issue --dir pki --coordinator && cnishift certs issue --dir pki --node node --ip 127.0.0.1")
            node.succeed("cp /root/pki/ca.pem /etc/cnishift/ca.pem && cp /root/pki/node.pem /etc/cnishift/node.pem && cp /root/pki/node-key.pem /etc/cnishift/node-key.pem")
            node.succeed("systemctl restart cnishift-agent")
            node.wait_for_open_port(7443)
            node.succeed("printf '[tls]\\nca=\"pki/ca.pem\"\\ncert=\"pki/coordinator.pem\"\\nkey=\"pki/coordinator-key.pem\"\\n[[nodes]]\\nname=\"node\"\\nrole=\"worker\"\\naddress=\"127.0.0.1:7443\"\\n' > /root/cluster.toml")
            out = node.succeed("cnishift preflight -i /root/cluster.toml -o json || true")
            assert '"name": "node"' in out and '"report"' in out, out
          '';
        };
      });
    };
}
