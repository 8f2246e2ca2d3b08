# Install layout and the Debian package (docs/install.md). Included from the top CMakeLists.txt.
#
#   bin/moonserve
#   share/moonserve/lua/        the engine's Lua runtime (found relative to bin/: ms_lua_dir)
#   share/moonserve/scripts/    the router and policy library (scripts/routers, scripts/policies)
#   share/moonserve/examples/   the example applications
#   share/moonserve/dashboards/ the Grafana dashboard
#   share/moonserve/web/dashboard/ the admin listener's web dashboard (found relative to bin/:
#                               ms_dashboard_dir)
#   share/doc/moonserve/        README.md and docs/
#   etc/moonserve/              config.yaml and hello.lua (/etc/moonserve when the prefix is /usr)
#   lib/systemd/system/moonserve.service
include(GNUInstallDirs)

set(MS_DATA_DEST ${CMAKE_INSTALL_DATADIR}/moonserve)

install(TARGETS moonserve RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${CMAKE_SOURCE_DIR}/lua/ DESTINATION ${MS_DATA_DEST}/lua)
install(DIRECTORY ${CMAKE_SOURCE_DIR}/scripts/routers ${CMAKE_SOURCE_DIR}/scripts/policies
  DESTINATION ${MS_DATA_DEST}/scripts)
install(DIRECTORY ${CMAKE_SOURCE_DIR}/examples DESTINATION ${MS_DATA_DEST}
  PATTERN __pycache__ EXCLUDE PATTERN "*.pyc" EXCLUDE)
install(DIRECTORY ${CMAKE_SOURCE_DIR}/dashboards DESTINATION ${MS_DATA_DEST})
install(DIRECTORY ${CMAKE_SOURCE_DIR}/web DESTINATION ${MS_DATA_DEST})
install(FILES ${CMAKE_SOURCE_DIR}/README.md DESTINATION ${CMAKE_INSTALL_DOCDIR})
# docs/ keeps its name so the links in README.md still resolve.
install(DIRECTORY ${CMAKE_SOURCE_DIR}/docs DESTINATION ${CMAKE_INSTALL_DOCDIR})

# The config folder and the unit's paths depend on the prefix given at install time
# (`cmake --install --prefix`, or /usr when CPack builds the .deb), not the configured one, so
# they are placed by a script that runs then.
install(CODE "set(MS_PACKAGING_DIR \"${CMAKE_SOURCE_DIR}/packaging\")
set(MS_HELLO_APP \"${CMAKE_SOURCE_DIR}/examples/hello/app.lua\")
set(MS_BUILD_DIR \"${CMAKE_BINARY_DIR}\")")
install(SCRIPT ${CMAKE_SOURCE_DIR}/packaging/install-etc.cmake)

# ---- the .deb (cpack -G DEB, or `cmake --build build --target package`) ----------------------
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME moonserve)
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_CONTACT "moonserve maintainers <moonserve@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "model-serving engine with Lua deployments (Ray Serve semantics)")
set(CPACK_PACKAGE_DESCRIPTION
  "moonserve serves applications written as Lua deployments behind one HTTP ingress, with \
replicas, autoscaling, request routing, batching and hot reload, following Ray Serve's \
semantics. Includes a systemd unit and a default config serving a hello application.")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_SECTION net)
set(CPACK_DEBIAN_PACKAGE_HOMEPAGE "https://github.com/moonserve/moonserve")
# Depends from the libraries the binary links (libuv1, libluajit2-5.1-2, libjansson4,
# libyaml-0-2, libc6), as dpkg-shlibdeps reads them; without it, the same list by hand.
find_program(MS_DPKG_SHLIBDEPS dpkg-shlibdeps)
if(MS_DPKG_SHLIBDEPS)
  set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
else()
  set(CPACK_DEBIAN_PACKAGE_DEPENDS
    "libc6 (>= 2.34), libuv1 (>= 1.44), libluajit2-5.1-2 | libluajit-5.1-2, libjansson4 (>= 2.14), libyaml-0-2")
endif()
# OpenBLAS (the dense-model CPU path) is opened at run time, so shlibdeps cannot see it: a
# Recommends, as nn.load is the only thing that needs it. Redis backs the task queue only.
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "libopenblas0")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "redis-server")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
  ${CMAKE_SOURCE_DIR}/packaging/debian/conffiles
  ${CMAKE_SOURCE_DIR}/packaging/debian/postinst
  ${CMAKE_SOURCE_DIR}/packaging/debian/prerm
  ${CMAKE_SOURCE_DIR}/packaging/debian/postrm)
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)
include(CPack)
