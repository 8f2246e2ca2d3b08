# Runs at install time (install(SCRIPT) in packaging/install.cmake): CMAKE_INSTALL_PREFIX is then
# the prefix being installed to. As GNUInstallDirs does, the /usr prefix keeps its configuration
# in /etc; any other prefix in PREFIX/etc. DESTDIR (CPack stages the .deb with it) is honoured by
# file(INSTALL) for absolute destinations.
if(CMAKE_INSTALL_PREFIX STREQUAL "/usr")
  set(ms_etc /etc)
else()
  set(ms_etc "${CMAKE_INSTALL_PREFIX}/etc")
endif()

file(INSTALL "${MS_PACKAGING_DIR}/config.yaml" DESTINATION "${ms_etc}/moonserve")
file(INSTALL "${MS_HELLO_APP}" DESTINATION "${ms_etc}/moonserve" RENAME hello.lua)

# The unit names /usr/bin and /etc; another prefix gets its own paths.
file(READ "${MS_PACKAGING_DIR}/moonserve.service" ms_unit)
string(REPLACE "/usr/bin/moonserve" "${CMAKE_INSTALL_PREFIX}/bin/moonserve" ms_unit "${ms_unit}")
string(REPLACE "/etc/moonserve/" "${ms_etc}/moonserve/" ms_unit "${ms_unit}")
string(REPLACE "file:///usr/share/doc/" "file://${CMAKE_INSTALL_PREFIX}/share/doc/" ms_unit
  "${ms_unit}")
set(ms_unit_tmp "${MS_BUILD_DIR}/packaging/moonserve.service")
file(WRITE "${ms_unit_tmp}" "${ms_unit}")
file(INSTALL "${ms_unit_tmp}" DESTINATION "${CMAKE_INSTALL_PREFIX}/lib/systemd/system"
  RENAME moonserve.service PERMISSIONS OWNER_READ OWNER_WRITE GROUP_READ WORLD_READ)
